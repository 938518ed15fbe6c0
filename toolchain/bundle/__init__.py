"""The bundle: the folder ``bdp compile`` writes and everything else reads. :mod:`.manifest`
is the one reader and writer of ``manifest.json``, :mod:`.signing` its Ed25519 signature,
:mod:`.format` writing a bundle atomically and loading one after every check."""
