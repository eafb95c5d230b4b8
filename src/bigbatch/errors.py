"""The user-facing error type. Imports nothing of bigbatch, so any module can raise it."""


class ConfigError(ValueError):
    """A user-facing problem (a flag, a file, a row); its message is one line naming the fix."""


# refused alike by training, `bigbatch plan` and plan.measure_peak
SIGLIP_WITH_TEACHER = ("--distill-model distils with CLIP's softmax loss (open_clip's DistillClipLoss), "
                       "not SigLIP's: drop --siglip or the distillation")
COCA_STUDENT_WITH_TEACHER = ("--distill-model with a CoCa student is not supported (nor in open_clip_train): "
                             "distil into a CLIP model, or drop --distill-model")
