"""Built-in demo material: the synthetic shapes world."""
