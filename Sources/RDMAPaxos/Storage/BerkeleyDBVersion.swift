import CBerkeleyDB

/// The Berkeley DB library this build linked, as reported by the library itself (`db_version`).
public enum BerkeleyDBLibrary {
    /// e.g. "Berkeley DB 5.3.28: (September  9, 2013)".
    public static var versionString: String {
        guard let s = db_version(nil, nil, nil) else { return "unknown" }
        return String(cString: s)
    }

    /// The linked library's major, minor and patch numbers.
    public static var version: (major: Int, minor: Int, patch: Int) {
        var major: Int32 = 0, minor: Int32 = 0, patch: Int32 = 0
        _ = db_version(&major, &minor, &patch)
        return (Int(major), Int(minor), Int(patch))
    }
}
