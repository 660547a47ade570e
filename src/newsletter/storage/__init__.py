"""Storage: every database the tool uses sits behind the interfaces in storage.base.

The SQLite implementation lives in storage/sqlite/; nothing outside this
package imports a database driver or holds SQL."""
