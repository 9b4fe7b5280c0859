"""Analysis scripts over the paper layer's cached runs: what the selections follow, the paper-style tables, one-off measurements."""
