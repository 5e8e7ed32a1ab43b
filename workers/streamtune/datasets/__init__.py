"""The shipped data sets: loaders, fixed train / held-out splits, and the reference set that
training and export both evaluate on."""
