"""Visual question answering on CT (``mv3d vqa-train``, ``mv3d vqa-eval``): CT-CHAT's VQA data, a local
Llama with its chat template, the encoder's cached image tokens projected into the LLM's input (LLaVA-1.5's
two-stage recipe: projector alignment, then LoRA instruction tuning), and CT-CHAT's text metrics."""
