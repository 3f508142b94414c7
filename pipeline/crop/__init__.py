"""Point-of-interest cropping: the ensemble as fully convolutional nets, heatmaps, crops, blacklist."""
