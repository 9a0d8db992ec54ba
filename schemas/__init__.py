"""Versioned output schemas shared by every reader and writer."""
