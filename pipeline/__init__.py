"""The InstructGPT RLHF recipe on the Hugging Face stack: pretrain → sft → rm → ppo."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft, so by most of this package) warns at import time on CPUs that it lacks the
# optional `kernels` package for its 4-bit matmul and falls back to its own: nothing to act on, and it would
# come before the one line an error gets. Silenced before any submodule imports it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
