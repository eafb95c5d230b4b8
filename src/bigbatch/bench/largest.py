"""The largest global batch one step completes, doubling (CUDA only)."""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch

from bigbatch.accumulation import cached_backward
from bigbatch.bench.environment import free_cuda, synchronize
from bigbatch.bench.peer import PeerData, PeerLoader, as_float, peer_args
from bigbatch.bench.setups import ACCUM, PEER, PLAIN, bigbatch_setup, model_shapes
from bigbatch.device import autocast_factory
from bigbatch.losses import ClipLoss
from bigbatch.model import parameter_groups
from bigbatch.patch_embedding import use_conv_patch_embedding
from bigbatch.step import optimizer_step, unscale_and_clip


def largest_batch_search(model_fn: Callable[[], torch.nn.Module], args, log: Callable[[str], None] = print) -> dict:
    """Largest global batch completing one step, doubling from b (CUDA only).

    plain doubles its one batch; the accumulated setups keep the micro-batch b and double
    K, reusing one micro-batch of data K times (the loss sees N = b*K samples; the inputs
    of a huge K would live in host memory anyway, docs/design.md section 1).
    """
    size, context, vocab = model_shapes(model_fn())
    results = {}
    kinds = [PLAIN, ACCUM] + ([] if args.skip_peer else [PEER])
    for kind in kinds:
        trials, best, stop = [], None, f"reached --max-batch-cap {args.max_batch_cap}"
        n = args.batch_size
        while n <= args.max_batch_cap:
            free_cuda()
            model = model_fn()
            try:
                seconds = _one_big_step(kind, model, n, size, context, vocab, args)
                trials.append({"global_batch": n, "seconds": round(seconds, 3)})
                best = n
                log(f"  {kind}: global batch {n} ok ({seconds:.1f}s)")
                timed = [t["seconds"] for t in trials if "seconds" in t]
                growth = max(2.0, timed[-1] / timed[-2]) if len(timed) > 1 and timed[-2] > 0 else 2.0
                if seconds * growth > args.max_batch_seconds:  # the peer's step grows ~ K * N^2
                    stop = (f"the next step would take about {seconds * growth:.0f}s, over "
                            f"--max-batch-seconds {args.max_batch_seconds}")
                    break
            except torch.OutOfMemoryError:
                trials.append({"global_batch": n, "error": "out of memory"})
                stop = f"out of memory at {n}"
                log(f"  {kind}: global batch {n} out of memory")
                break
            except Exception as error:
                trials.append({"global_batch": n, "error": f"{type(error).__name__}: {error}"})
                stop = f"{type(error).__name__} at {n}"
                break
            finally:
                del model
                free_cuda()
            n *= 2
        results[kind] = {"largest_global_batch": best, "stopped": stop, "trials": trials}
    for kind in (PLAIN, ACCUM):
        results[kind]["loss"] = "bigbatch ClipLoss() (tiles by itself above 8192^2 logits)"
    return results


def _one_big_step(kind, model, n, size, context, vocab, args) -> float:
    device = torch.device(args.device)
    b = args.batch_size
    micro = n if kind == PLAIN else b
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (micro, 3, *size), dtype=torch.uint8, generator=g).to(device)
    texts = torch.randint(1, vocab, (micro, context), generator=g).to(device)
    search_args = copy.copy(args)
    search_args.accum_freq = n // micro
    synchronize(device)
    start = time.perf_counter()
    if kind == PEER:
        import open_clip
        from open_clip_train.train import train_one_epoch
        use_conv_patch_embedding(model)  # open_clip's own modules
        optimizer = torch.optim.AdamW(parameter_groups(model, args.wd), lr=args.lr)
        scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" else None
        data = {"train": PeerData(PeerLoader([(as_float(images), texts)] * search_args.accum_freq))}
        train_one_epoch(model, data, open_clip.ClipLoss(), 0, optimizer, scaler, None, None,
                        peer_args(search_args))
    else:
        loss_fn = ClipLoss()
        setup = bigbatch_setup(kind, model, search_args, [(images, texts)], micro=False, loss_fn=loss_fn)
        micro_batches = [(images, texts)] * search_args.accum_freq
        scaler = torch.amp.GradScaler("cuda") if args.precision == "amp" else None
        cached_backward(model, micro_batches, loss_fn,
                        autocast=autocast_factory(args.precision, device), grad_scaler=scaler)
        unscale_and_clip(model, setup.optimizer, scaler, None)
        optimizer_step(model, setup.optimizer, scaler)
    synchronize(device)
    return time.perf_counter() - start

