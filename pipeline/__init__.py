"""The InstructGPT RLHF recipe on the Hugging Face stack: pretrain → sft → rm → ppo."""

__version__ = "0.1.0"
