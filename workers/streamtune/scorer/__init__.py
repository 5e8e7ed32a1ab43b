"""The scoring worker: Faust agents at the edges, pure stages in between."""
