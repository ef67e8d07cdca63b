-- Small shared settings, e.g. the key that signs pagination cursors (the same for every instance).
CREATE TABLE seaport_settings (
    name   TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);
