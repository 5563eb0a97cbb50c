"""Input and output: dataset reading, sharding, prompt rendering, atomic part writer, manifest."""
