"""Model families: `base` (the Family interface), `registry` (get_family), one sub-package per family. The
package itself imports nothing, so importing any part of it pulls in no other part."""
