"""Fine-tuning methods: SFT, LoRA, chain-of-thought fine-tuning, instruction tuning, distillation."""
