"""The network: the MiniMind language model, the vision-language model on top of it, and the weight-file loader."""
