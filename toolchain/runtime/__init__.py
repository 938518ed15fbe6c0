"""The runtime: running a bundle (:mod:`.run`, pictures in :mod:`.viz`) and timing it here
(:mod:`.profile`, :mod:`.timing`), on a board over TVM RPC (:mod:`.remote`, :mod:`.rpc`, the
board list in :mod:`.boards`) or on a Cortex-A72 model (:mod:`.estimate`, whose QEMU plugin is
``estimator/``); :mod:`.charts` draws the figures."""
