"""The files stages hand each other: manifests, webdataset shards of hidden states and
labels, the sharded sense dictionary, and the input corpus. Every stage may import these;
they import no stage."""
