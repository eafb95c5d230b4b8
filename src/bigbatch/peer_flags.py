"""open_clip_train's flags here: what each one does in bigbatch, and the few it refuses.

`TABLE` has a row for every flag of open_clip_train's parser (a test reads that parser,
so a new peer flag without a row fails it); the README's compatibility table is
`markdown_table()` (`python -m bigbatch.peer_flags` prints it). `refusal(cfg)` names a
flag that has no sense here, in one line saying what to use.
"""

from __future__ import annotations

SAME = "same meaning"

# flag -> (bigbatch's behaviour, where it differs on purpose)
TABLE: dict[str, tuple[str, str]] = {
    "--train-data": (SAME, "also CSV and `::`-joined sources of any kind; `pipe:` commands and http(s) URLs are read as by the peer (webdataset's gopen), other URLs (`s3://`, `memory://`, ...) with fsspec"),
    "--train-data-upsampling-factors": ("with `--dataset-resampled`: each source's shards drawn in proportion to its factor", ""),
    "--val-data": (SAME, ""),
    "--train-num-samples": (SAME, "read from `sizes.json`/`_info.json` beside the shards when omitted (beside the file a `pipe:` command names, or through fsspec beside a URL)"),
    "--val-num-samples": (SAME, ""),
    "--dataset-type": (SAME, ""),
    "--dataset-resampled": (SAME, ""),
    "--csv-separator": (SAME, ""),
    "--csv-img-key": (SAME, ""),
    "--csv-caption-key": (SAME, ""),
    "--imagenet-val": ("zero-shot top-1/5 on an ImageFolder tree of the 1000 synset folders, built-in class names and the 80 OpenAI templates; logged as `imagenet-zeroshot-val-top1/top5`", ""),
    "--imagenet-v2": ("as `--imagenet-val` (synset folders, or ImageNetV2's folders `0`..`999` read as class numbers); logged as `imagenetv2-zeroshot-val-top1/top5`", "reads the folder tree itself, no `imagenetv2_pytorch`"),
    "--cache-dir": ("where open_clip finds pretrained weights and tokenizer files", "never downloads: weights missing from the cache are one error line"),
    "--logs": (SAME, ""),
    "--log-local": ("each node's first process also writes `out-RANK.log`", ""),
    "--name": (SAME, "an existing run folder needs `--resume latest`"),
    "--workers": (SAME, "default 1, not 4"),
    "--batch-size": ("the micro-batch per rank", "also `auto` (the largest that fits the GPU)"),
    "--epochs": (SAME, ""),
    "--epochs-cooldown": (SAME, ""),
    "--lr": (SAME, "default 5e-4 for every model"),
    "--beta1": (SAME, ""),
    "--beta2": (SAME, ""),
    "--eps": (SAME, ""),
    "--wd": (SAME, "no decay on any 1-d parameter, logit scale and bias (open_clip_train also matches names with `bn`/`ln`/`bias`)"),
    "--momentum": ("momentum of `--opt sgd` and timm optimizers", ""),
    "--warmup": (SAME, ""),
    "--opt": ("`adamw` (fused kernel), `sgd` (with `--momentum`, Nesterov off), `timm/NAME`", "plain `sgd` is accepted"),
    "--use-bn-sync": ("SyncBatchNorm across ranks", "statistics are still those of one micro-batch per rank"),
    "--skip-scheduler": (SAME, ""),
    "--lr-scheduler": ("`cosine`, `const`, `const-cooldown`", ""),
    "--lr-cooldown-end": (SAME, ""),
    "--lr-cooldown-power": (SAME, ""),
    "--save-frequency": (SAME, ""),
    "--save-most-recent": ("accepted; `epoch_latest.pt` is always written", "always on"),
    "--zeroshot-frequency": (SAME, "also applies to `--val-data` with labels"),
    "--val-frequency": (SAME, ""),
    "--resume": (SAME, "`latest` finds `epoch_latest.pt`; resumes mid-epoch exactly"),
    "--precision": ("`amp`, `amp_bf16`/`amp_bfloat16` (autocast), `pure_bf16`/`pure_fp16` (weights in that dtype, no autocast), `bf16`/`fp16` (open_clip's low-precision matmul weights), `fp32`", "default `auto`: amp on CUDA, fp32 on CPU"),
    "--model": (SAME, "also `bigbatch-tiny`/`bigbatch-small` and a model-config JSON; `hf-hub:` only from the "
                      "local cache; models with a Hugging Face text tower or tokenizer (SigLIP, NLLB, RoBERTa, "
                      "XLM-R, mT5) need `pip install transformers sentencepiece` and their files in that cache"),
    "--pretrained": (SAME, "also bigbatch checkpoints; tags only from the local cache"),
    "--pretrained-image": (SAME, "timm weights only from the local cache"),
    "--lock-image": (SAME, "a fully frozen tower is embedded once per sample, not recomputed"),
    "--lock-image-unlocked-groups": (SAME, ""),
    "--lock-image-freeze-bn-stats": (SAME, ""),
    "--image-mean": (SAME, "images still travel as uint8 and are normalised on the device"),
    "--image-std": (SAME, "images still travel as uint8 and are normalised on the device"),
    "--image-interpolation": (SAME, ""),
    "--image-resize-mode": (SAME, ""),
    "--aug-cfg": ("key=value pairs of open_clip's `AugmentationCfg`", "an unknown key is an error line, not a traceback"),
    "--grad-checkpointing": (SAME, ""),
    "--local-loss": (SAME, "needs `--gather-with-grad` (without it the gradient is wrong)"),
    "--gather-with-grad": (SAME, ""),
    "--force-context-length": (SAME, ""),
    "--force-image-size": (SAME, ""),
    "--force-quick-gelu": (SAME, ""),
    "--force-patch-dropout": (SAME, ""),
    "--force-custom-text": (SAME, ""),
    "--torchscript": ("refused", "TorchScript is deprecated and cannot be trained through: export with `bigbatch export`"),
    "--torchcompile": ("compiles the model in place (`model.compile()`)", "inductor's random ops fall back to eager ones, so pass 2 replays pass 1's dropout exactly; checkpoints keep their parameter names; one graph per grad mode (pass 1 runs without grad), compiled in the first step (an epoch's smaller last micro-batch adds one with a dynamic batch size); on an H200, ViT-B-32's accumulated step ran 1.55× faster after an 85 s compile"),
    "--trace": ("refused", "a traced model cannot train: export with `bigbatch export`"),
    "--accum-freq": ("exact feature-cached accumulation", "the large-batch gradient exactly (logit scale once, dropout replayed)"),
    "--device": (SAME, "default `auto`"),
    "--dist-url": ("the process group's `init_method`", "default `env://` (torchrun, SLURM)"),
    "--dist-backend": ("`auto`, `nccl`, `gloo`", "auto: nccl on GPUs, gloo on CPU"),
    "--report-to": ("`tensorboard`, `wandb`, both comma-separated, or `all`", "wandb is the optional extra `bigbatch[wandb]`"),
    "--wandb-notes": (SAME, ""),
    "--wandb-project-name": (SAME, ""),
    "--debug": ("debug-level log lines", ""),
    "--copy-codebase": ("copies the running `bigbatch` package to `RUN/code/`", "copies the package, not a repository checkout; the run does not execute from the copy"),
    "--horovod": ("refused", "launch with torchrun or srun (DDP/FSDP2)"),
    "--ddp-static-graph": ("DDP(static_graph=True) with `--accum-freq 1`", "ignored, with a warning, for `--accum-freq` > 1: DDP's static graph breaks under the two passes of a cached step"),
    "--no-set-device-rank": ("every rank uses `cuda:0`", ""),
    "--seed": (SAME, "rank r draws dropout from seed + r; data order from seed alone"),
    "--grad-clip-norm": (SAME, "clips the accumulated gradient, once per step"),
    "--lock-text": (SAME, "a fully frozen tower is embedded once per sample, not recomputed"),
    "--lock-text-unlocked-layers": (SAME, ""),
    "--lock-text-freeze-layer-norm": (SAME, ""),
    "--log-every-n-steps": (SAME, "counts optimizer steps"),
    "--coca-caption-loss-weight": (SAME, ""),
    "--coca-contrastive-loss-weight": (SAME, ""),
    "--remote-sync": ("copies the run folder to `URL/NAME` with fsspec (any fsspec URL or a path)", ""),
    "--remote-sync-frequency": (SAME, "seconds"),
    "--remote-sync-protocol": ("`s3` and `fsspec` both copy with fsspec", "default `fsspec`; `s3` does not call the aws CLI"),
    "--delete-previous-checkpoint": ("keeps only the newest `epoch_N.pt`", "deletes every older `epoch_N.pt`, not only N-1"),
    "--distill-model": (SAME, "with any `--accum-freq` (open_clip_train: 1 only), exact: the teacher embeds each sample once, the distillation term is taken over the global batch; needs `--distill-pretrained`; not with `--siglip` or a CoCa student; logged as `distill_loss` and `contrastive_loss`"),
    "--distill-pretrained": (SAME, "a checkpoint file, or a tag from the local cache (nothing is downloaded)"),
    "--use-bnb-linear": ("replaces the towers' MLP linears by that bitsandbytes class", "needs `pip install bitsandbytes`"),
    "--siglip": (SAME, ""),
    "--loss-dist-impl": ("accepted (SigLIP: bidir, shift, reduce, gather)", "features are always all-gathered once per step: the same loss and gradient"),
}

# flag -> why it stops and what to use instead
REFUSED = {
    "horovod": "--horovod: bigbatch runs on torch.distributed, not Horovod: launch with torchrun "
               "(or srun) and drop --horovod",
    "torchscript": "--torchscript: a TorchScript model cannot be trained through feature-cached "
                   "accumulation (and TorchScript is deprecated): drop it; `bigbatch export` writes a "
                   "plain open_clip checkpoint to script later",
    "trace": "--trace: a traced model is for inference only and cannot train: drop it; `bigbatch "
             "export` writes a plain open_clip checkpoint to trace later",
}


def refusal(cfg) -> str | None:
    """The one-line reason a set option cannot run here, or None."""
    for name, message in REFUSED.items():
        if getattr(cfg, name):
            return message
    return None


def markdown_table() -> str:
    rows = ["| open_clip_train flag | bigbatch | differs on purpose |", "|---|---|---|"]
    for flag, (behaviour, difference) in TABLE.items():
        rows.append(f"| `{flag}` | {behaviour} | {difference} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
