"""Moving models between zaizai and other tools: Hugging Face transformers (``hf``) and llama.cpp (``gguf``)."""
