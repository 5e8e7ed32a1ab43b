"""The online trainer worker."""
