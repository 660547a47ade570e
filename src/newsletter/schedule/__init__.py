"""Schedule: when issues are due (slots) and the runner that sends each slot exactly once.

runner also holds ``schedule run``'s loop (run_schedule) and what ``newsletter
schedule`` shows (planned_slots); the CLI wires the settings, signals and printing."""
