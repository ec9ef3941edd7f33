"""The front end: everything on the requester's side of the two workers."""
