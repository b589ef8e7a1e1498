"""Exporting a trained model to other ecosystems: ``hf`` (a Hugging Face Qwen2-MoE directory),
with ``reference`` (an independent NumPy forward of that architecture) to check the export."""
