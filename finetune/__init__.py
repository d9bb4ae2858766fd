"""LoRA fine-tuning of the explainer model (peft). Built in the fine-tuning issue."""
