"""``turbotune bench``: scenarios measured side by side, each point in its own process.

Design note. A scenario file names training configurations (built-in Hugging Face baselines or
turbotune configs) and the points to run them at (models x batch shapes x GPU counts). The
parent process (:mod:`.runner`) never touches CUDA: it expands the points (:mod:`.scenarios`),
checks each turbotune config, and starts one worker process per point (:mod:`.worker`), so
every point begins with empty device memory and no patches left by another scenario. A worker
builds the model with random weights directly on the device, quantizing linear layers one at
a time when the scenario is 4-bit (:mod:`.build`, shapes from :mod:`.models`), prepares it as
the scenario says (:mod:`.setups`), and runs the one timed loop every scenario shares
(:mod:`.loop`). A crash or out-of-memory becomes that point's status; the run goes on. The
parent then writes ``results.csv``, ``results.md`` with ratios to the baseline, plots and
``env.json`` (:mod:`.report`, :mod:`.plots`, :mod:`.env`), and compares with a reference CSV.

The parent imports torch but not transformers' models, and never creates a CUDA context.
The verb: ``add_bench_parser`` and ``run_bench_command`` in :mod:`turbotune.bench.cli`.
"""
