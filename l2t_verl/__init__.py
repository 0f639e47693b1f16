"""L2T (Learning to Think) on top of verl."""
