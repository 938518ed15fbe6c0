"""``bdp bench``: the performance suite (:mod:`.suite`) and its tables (:mod:`.rpi4`,
:mod:`.float_layers`, :mod:`.wild`), all built on :mod:`.table`; :mod:`.chart` draws the
speed-up chart, :mod:`.results` trains and scores the zoo (``python -m bdp.toolchain.bench.results``)."""
