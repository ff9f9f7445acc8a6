"""Process layouts: one process (`Server` alone) or a supervisor with N worker processes."""
