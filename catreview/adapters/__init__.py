"""Adapters: LoRA adapter versions and the gate, training jobs, the training config and the run-folder contract."""
