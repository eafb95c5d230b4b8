"""What a plan says to a user: the table of its terms, and what to change when it does not fit."""

from __future__ import annotations

from bigbatch.plan.formula import MemoryPlan
from bigbatch.plan.sizes import gib


def format_plan(plan: MemoryPlan) -> str:
    """A table of the plan in GiB: each term, the peak and, if it does not fit, the fixes."""
    K, W = plan.accum_freq, plan.world_size
    ckpt = "with" if plan.grad_checkpointing else "without"
    lines = [
        f"{plan.model}, {plan.precision}, {ckpt} grad checkpointing ({plan.source}, for {plan.target})",
        f"global batch {plan.global_batch_size} = batch-size {plan.batch_size} x accum-freq {K} "
        f"x world-size {W}",
        "",
        f"{'per GPU':<54}{'GiB':>8}",
    ]
    inputs = ("offloaded: 2 micro-batches at most" if plan.offload_inputs and K > 1
              else "1 micro-batch" if K == 1 else f"{K} micro-batches")
    loss = f"tiles of {plan.loss_tile}" if plan.loss_tile else "plain logits"
    rows = [
        ("weights" + (" (+ their EMA copy)" if plan.ema_weights else "")
         + (" (+ the teacher's)" if plan.teacher_weights else ""), plan.weights),
        ("gradients", plan.gradients),
        ("a new gradient before it joins .grad (the largest)", plan.gradient_transient),
        ("optimizer state (AdamW, 2 moments)", plan.optimizer_state),
        (f"inputs ({inputs})", plan.inputs),
        (f"activations (1 micro-batch of {plan.batch_size})", plan.activations),
        (f"cached features ({plan.batch_size * K} rows" + (", + grads" if K > 1 else "")
         + (", + teacher's" if plan.teacher_features else "") + ")", plan.cached_features),
        (f"loss working set ({loss})", plan.loss_working_set),
    ]
    if plan.teacher_weights:
        rows.append(("teacher inference (1 micro-batch, pass 1)", plan.teacher_inference))
    lines += [f"  {name:<52}{gib(size):>8}" for name, size in rows]
    lines.append("-" * 62)
    lines.append(f"{'peak (' + plan.phase + ' phase)':<54}{gib(plan.peak):>8}")
    lines += formula_lines(plan)
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"{verdict} in {gib(plan.gpu_memory)} GiB ({gib(plan.usable_memory)} GiB usable, "
                     f"{plan.reserve:.0%} reserve for the CUDA context, fragmentation, transients)")
        if not plan.fits:
            lines.append("to fit, try:")
            lines += [f"  - {text}" for text in suggestions(plan)]
    return "\n".join(lines)


def formula_lines(plan: MemoryPlan) -> list[str]:
    """How the table's terms make the peak, in this plan's case."""
    one_pass = plan.accum_freq == 1 and plan.world_size == 1  # the towers' backward one after the other
    phases = ["loss", "pass 2"] + ["pass 1"] * bool(plan.teacher_weights) + ["bucket rebuild"] * bool(plan.ddp_buckets)
    lines = [f"  = weights + optimizer + inputs + max({', '.join(phases)})",
             "    loss:   activations + cached features + loss working set"
             + (" + gradients (DDP's buckets, zeroed)" if plan.ddp_buckets else ""),
             "    pass 2: " + ("max(activations, gradients + activations / 2)" if one_pass else
                             "activations + feature grads + gradients + a new gradient")]
    if plan.teacher_weights:
        lines.append("    pass 1: activations + features + teacher inference")
    if plan.ddp_buckets:
        lines.append("    bucket rebuild (DDP, once, step 2): pass 1's other cached features + 2 x gradients")
    return lines


def no_fit_message(plan: MemoryPlan) -> str:
    """One message: what does not fit, and what to change."""
    what = (f"--model {plan.model} does not fit {gib(plan.gpu_memory)} GiB "
            f"({gib(plan.usable_memory)} GiB usable, {plan.reserve:.0%} kept in reserve) even at "
            f"--batch-size {plan.batch_size}: it needs {gib(plan.peak)} GiB")
    return what + ". Fixes: " + "; ".join(suggestions(plan))


def suggestions(plan: MemoryPlan) -> list[str]:
    """What to change, biggest saving first, for a plan that does not fit."""
    fixed = plan.weights + plan.optimizer_state + plan.gradients
    found: list[tuple[int, str]] = []
    if not plan.offload_inputs and plan.accum_freq > 1:
        saving = plan.inputs - plan.inputs // plan.accum_freq
        found.append((saving, f"--offload-inputs (the step's {plan.accum_freq} micro-batches of "
                              f"inputs take {gib(plan.inputs)} GiB on the GPU)"))
    if not plan.grad_checkpointing:
        ckpt = plan.activations_checkpointed
        saving = plan.activations - ckpt if ckpt is not None else plan.activations // 2
        detail = f" (activations {gib(plan.activations)} -> {gib(ckpt)} GiB)" if ckpt is not None else ""
        found.append((saving, f"--grad-checkpointing{detail}"))
    if plan.batch_size > 1:
        found.append((plan.activations // 2, "a lower --batch-size with a higher --accum-freq "
                                             "(activations scale with the micro-batch; the "
                                             "gradient is the same)"))
    if plan.world_size > 1 and not plan.local_loss:
        found.append((plan.loss_working_set // 2, "--local-loss --gather-with-grad (each rank "
                                                  "takes only its own rows of the loss)"))
    found.append(((plan.inputs + plan.cached_features) // 2, "more GPUs (--world-size): the global batch, "
                                                      "its inputs and cached features are split "
                                                      "over them"))
    if plan.teacher_weights:
        found.append((plan.teacher_weights + plan.teacher_inference,
                      f"a smaller --distill-model (the teacher's weights take {gib(plan.teacher_weights)} GiB, "
                      f"its inference over a micro-batch {gib(plan.teacher_inference)} GiB)"))
    if fixed > (plan.usable_memory or fixed):
        found.append((fixed, f"weights, gradients and AdamW state alone take {gib(fixed)} GiB: "
                             f"shard them over GPUs with --fsdp, or lock a tower"))
    elif plan.ddp_buckets:
        W = plan.world_size
        found.append((fixed * (W - 1) // W,
                      f"--fsdp (weights, gradients and AdamW state, {gib(fixed)} GiB, sharded over the "
                      f"{W} GPUs; no DDP buckets to rebuild)"))
    return [text for _, text in sorted(found, key=lambda item: -item[0])]
