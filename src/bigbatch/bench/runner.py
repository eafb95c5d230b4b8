"""The whole benchmark: the configurations set up, every study in order, the result written.

How it is measured (no time is ever asserted): the step throughput
(bigbatch.bench.throughput), the memory of one untimed step per configuration
(bigbatch.bench.step_memory), the loss working set at N = 4k ... 64k (256k on CUDA)
(bigbatch.bench.loss), and on CUDA the largest global batch one step completes
(bigbatch.bench.largest); with --profile, where a step's time goes (bigbatch.bench.phases).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import traceback
from pathlib import Path
from typing import Callable

import torch

from bigbatch.bench.environment import device_name, free_cuda, load_average, versions, wait_for_quiet
from bigbatch.bench.largest import largest_batch_search
from bigbatch.bench.loss import loss_working_set
from bigbatch.bench.peer import peer_setup
from bigbatch.bench.phases import phase_times, profile_steps
from bigbatch.bench.report import markdown, mib, plot, targets
from bigbatch.bench.setups import ACCUM, PEER, PLAIN, PLAIN_MICRO, Setup, bigbatch_setup, make_batches, model_shapes
from bigbatch.bench.step_memory import measure_memory
from bigbatch.bench.throughput import summarize, time_interleaved
from bigbatch.device import use_fast_cuda_math
from bigbatch.model import create_model


MEMORY_METHOD = ("saved_peak_bytes: peak over the step of the bytes autograd saved for "
                 "backward (saved_tensors_hooks; each storage once; freed via weakref "
                 "finalizers; weights/optimizer state/inputs excluded). live_peak_bytes (CPU): "
                 "peak of all tensors created in the step (TorchDispatchMode), temporaries, "
                 "gradients and cached features included. cuda_peak_bytes: "
                 "max_memory_allocated over the step minus the baseline, plus this "
                 "configuration's weights and optimizer state.")
TIMING_METHOD = ("each round runs one step of every configuration in a rotating order; "
                 "ratio_to_plain is the median over rounds of t_plain / t_config of the "
                 "same round; samples/s = global batch / step seconds")


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """The whole benchmark; returns the result dict (also written to args.out)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        use_fast_cuda_math()  # as both trainers set CUDA up
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = wait_for_quiet(args.wait_quiet, args.quiet_load) if args.wait_quiet > 0 else None
    torch.manual_seed(args.seed)
    template = create_model(args.model, device=device, tokenizer=False).model
    size, context, vocab = model_shapes(template)
    b, k = args.batch_size, args.accum_freq
    batches = make_batches(2, b * k, size, context, vocab, device, args.seed)

    env = {"device": str(device), "device_name": device_name(device), "versions": versions(),
           "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
           "load_average_start": load_average(), "hostname_cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "wait_for_quiet": quiet}
    config = dict(vars(args), global_batch=b * k, image_size=list(size), context_length=context,
                  n_parameters=sum(p.numel() for p in template.parameters()),
                  data="2 global batches of random uint8 images and random token ids, made once, "
                       "alternating by round; the same for every configuration (open_clip_train "
                       "gets them as normalised float32, as its loader gives them)")
    log(f"bench: {args.model} ({config['n_parameters'] / 1e6:.1f} M params) on {env['device_name']}, "
        f"{args.precision}, b={b} x K={k}; load {env['load_average_start']}")

    setups, configs = set_up(template, args, batches, log)
    setups = timed(setups, configs, args, device, log)
    if not args.skip_memory:
        log("memory: one untimed step of each configuration under the meters")
        for setup in setups:
            configs[setup.name]["memory"] = m = measure_memory(setup, batches, device,
                                                               args.warmup_steps + args.steps)
            log(f"  {setup.name}: saved for backward {mib(m['saved_peak_bytes'])} MiB"
                + (f", step tensors {mib(m['live_peak_bytes'])} MiB" if "live_peak_bytes" in m else "")
                + (f", CUDA peak {mib(m['cuda_peak_bytes'])} MiB" if "cuda_peak_bytes" in m else ""))

    result = {"config": config, "environment": env, "configs": configs,
              "memory_method": MEMORY_METHOD, "timing_method": TIMING_METHOD}
    if args.profile:
        log("phases and profile")
        result["phases"] = phase_times(template, args, batches)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result["profile"] = profile_steps(setups, out / f"profile-{device.type}-{Path(args.model).stem}-b{b}x{k}.txt", 0)
    del setups
    free_cuda()

    if args.loss_sizes:
        log(f"loss working set at N = {args.loss_sizes}, D = {args.loss_dim}")
        result["loss_working_set"] = loss_working_set(args.loss_sizes, args.loss_dim, args.loss_tile,
                                                      args.loss_measure_max, device, log)
    if device.type == "cuda" and not args.skip_max_batch:
        log("largest global batch (doubling)")

        def fresh_model():
            torch.manual_seed(args.seed)
            return create_model(args.model, device=device, tokenizer=False).model
        result["largest_batch"] = largest_batch_search(fresh_model, args, log)

    env["load_average_end"] = load_average()
    result["targets"] = targets(configs, k)
    write_outputs(result, Path(args.out))
    return result


def set_up(template, args, batches, log: Callable[[str], None]) -> tuple[list[Setup], dict[str, dict]]:
    """Each configuration with its own copy of the model, after one untried step: it fails
    here, not in the middle of the timing (the peer may not run, a batch may not fit).
    Returns the setups that ran and the configurations that did not, with the reason."""
    b, k = args.batch_size, args.accum_freq
    configs: dict[str, dict] = {}
    setups = []
    makers = [(PLAIN, f"{b * k}", lambda: bigbatch_setup(PLAIN, copy.deepcopy(template), args, batches, micro=False)),
              (ACCUM, f"{b} x {k}", lambda: bigbatch_setup(ACCUM, copy.deepcopy(template), args, batches, micro=True))]
    if k > 1:  # the accumulated step's own cost: the same micro-batch, plain
        makers.insert(1, (PLAIN_MICRO, f"{b} ({k} steps)", lambda: bigbatch_setup(
            PLAIN_MICRO, copy.deepcopy(template), args, batches, micro=True, steps_per_micro=True)))
    if not args.skip_peer:
        makers.append((PEER, f"{b} x {k}", lambda: peer_setup(copy.deepcopy(template), args, batches)))
    else:
        configs[PEER] = {"batch": f"{b} x {k}", "error": "skipped (--skip-peer)"}
    for name, label, make in makers:
        try:
            setup = make()
            setup.step(0)
            setups.append(setup)
        except Exception as error:
            oom = isinstance(error, torch.OutOfMemoryError)
            reason = "out of memory" if oom else f"{type(error).__name__}: {error}"
            log(f"  {name} cannot run here: {reason}")
            configs[name] = {"batch": label, "error": reason,
                             **({} if oom else {"traceback": traceback.format_exc(limit=5)})}
        setup = None
        free_cuda()  # what a failed configuration allocated
    return setups, configs


def timed(setups: list[Setup], configs: dict[str, dict], args, device: torch.device,
          log: Callable[[str], None]) -> list[Setup]:
    """The throughput study into `configs` (in the order plain, plain per micro-batch,
    accumulated, peer); returns
    the setups that did not run out of memory beside the others."""
    log(f"timing {args.warmup_steps} warm-up + {args.steps} rounds of {', '.join(s.name for s in setups)}")
    times = time_interleaved(setups, args.steps, args.warmup_steps, device, log)
    for failed in [s for s in setups if s.extra.get("error")]:
        configs[failed.name] = {"batch": failed.batch_label, **failed.extra}
    setups = [s for s in setups if not s.extra.get("error")]
    summary = summarize({s.name: times[s.name] for s in setups}, args.batch_size * args.accum_freq)
    for setup in setups:
        configs[setup.name] = {"batch": setup.batch_label, **summary[setup.name], **setup.extra}
    ordered = {name: configs.pop(name) for name in (PLAIN, PLAIN_MICRO, ACCUM, PEER) if name in configs}
    configs.update(ordered)
    return setups


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    """bench-<device>-<model>-b<b>x<K>.{json,md,png} in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    config = result["config"]
    device = torch.device(result["environment"]["device"]).type
    stem = f"bench-{device}-{Path(config['model']).stem}-b{config['batch_size']}x{config['accum_freq']}"
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
