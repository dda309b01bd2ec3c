"""minillm (public API being assembled)."""
