"""ellama-recipes: domain-adapt Llama 3.1 (continued pretraining, SFT, DPO) on NVIDIA NeMo."""

__version__ = "0.1.0"
