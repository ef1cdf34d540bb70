"""NBD export of pool volumes: the protocol codec (``proto``), the asyncio server (``server``), its
compiled transmission loop (``_cnbd.c``, driven by ``engine``), and kernel or FUSE mounts of an export
(``mounting``)."""
