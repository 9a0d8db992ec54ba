"""Media handling: sniffing, PDF pages, images and video clips into inference units."""
