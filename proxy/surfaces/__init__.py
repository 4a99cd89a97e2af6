"""API surfaces: what Tollgate knows of each API's requests, answers and streams."""
