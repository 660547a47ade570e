"""Schedule: when issues are due (slots) and the runner that sends each slot exactly once."""
