"""The names a run can choose between, importable without torch.

The command line is checked against these before anything heavy is imported, so a bad flag is
reported in well under a second; the modules that implement each choice import them from here.
"""

OBJECTIVES = ("NSR", "PSR", "W_REINFORCE", "REINFORCE", "GRPO")
LOSS_AGGREGATIONS = ("paper", "batch_token_mean")
ROLLOUT_IS_MODES = ("none", "tis", "mis")
# rlvr/optimizers.py's OPTIMIZERS, plus "auto" (a test keeps the two in step)
OPTIM_CHOICES = ("auto", "adamw", "adamw_kahan", "adamw_8bit", "adamw_offload",
                 "adamw_kahan_offload")
