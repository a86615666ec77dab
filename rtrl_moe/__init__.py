"""Exact sparse real-time recurrent learning for recurrent mixtures of experts."""
