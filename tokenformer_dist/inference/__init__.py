"""Using a trained model: the inference launch at any TP degree from a checkpoint of any TP (`launch`),
validation loss (`evaluate`), sampling (`generate`) and the Hugging Face export (`hf/`)."""
