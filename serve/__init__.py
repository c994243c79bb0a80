"""Looking at a cache by eye: `litpipe search` (text to image, with a contact sheet) and `litpipe serve` (a
local web page for search and zero-shot), over the cached vectors and a trained text tower."""
