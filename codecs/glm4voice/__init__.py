"""GLM-4-Voice speech tokenizer (Whisper-VQ) and decoder (flow matching + HiFT)."""
