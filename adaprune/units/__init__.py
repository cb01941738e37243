"""Units: the ownership table of removable units, and the shared means of scaling and training against them."""
