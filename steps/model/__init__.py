"""GPT-2 with LoRA (gpt2, lora) and its tokenizer."""
