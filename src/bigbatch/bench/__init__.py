"""The step benchmark behind `bigbatch bench`: bigbatch's feature-cached accumulation
against a plain step and open_clip_train's, side by side in one process, on one model
(the same initial weights), one set of synthetic batches and one set of flags.

    setups        the configurations: bigbatch plain (K = 1 at b x K) and accumulated
    peer          open_clip_train's own train_one_epoch, fed from memory
    throughput    the step throughput study: interleaved rounds, paired ratios
    step_memory   the memory study: one untimed step under bigbatch.memory's meter
    loss          the loss working-set study: plain and tiled, measured and analytic
    largest       the largest global batch one step completes (CUDA)
    phases        where a step's time goes (--profile)
    environment   the device, versions and load a result was measured on
    report        the markdown table, the targets and the figure
    runner        every study in order, the result written to bench/
    command       `bigbatch bench` (scripts/bench.py calls it)
"""
