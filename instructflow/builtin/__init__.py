"""The built-in model (`builtin:tiny`) and the small world of facts it is pre-trained on."""
