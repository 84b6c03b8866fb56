"""The commands that use a trained model, on top of the library (userpipe.trainer): `userpipe eval`,
`index`, `search` (and its HTML page) and `report`."""
