"""Records to tensors: image preprocessing and the prompt builder, dataset readers, the CLIP feature cache."""
