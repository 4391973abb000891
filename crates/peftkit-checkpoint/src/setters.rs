//! Chained setters for the options structs of every crate, so a caller writes
//! `SaveOptions::default().variant("fp16").max_shard_size(5_000_000_000)` and a field added
//! later (with its default) breaks no caller. One macro, so every options struct of the
//! workspace gets the same shape of setter.

/// Defines a chained setter per listed field of an options struct (which must be `Default`
/// or have a constructor): `field: Type` takes `impl Into<Type>`; `field: Some(Type)` is an
/// `Option<Type>` field and takes `impl Into<Type>`, setting `Some`.
///
/// ```
/// #[derive(Default)]
/// pub struct Options {
///     /// How many.
///     pub count: u64,
///     /// A name.
///     pub name: Option<String>,
/// }
/// peftkit_checkpoint::option_setters!(Options { count: u64, name: Some(String) });
///
/// let o = Options::default().count(3u64).name("x");
/// assert_eq!((o.count, o.name.as_deref()), (3, Some("x")));
/// ```
#[macro_export]
macro_rules! option_setters {
    ($ty:ident { $($fields:tt)* }) => {
        impl $ty {
            $crate::option_setters!(@fields $($fields)*);
        }
    };
    (@fields) => {};
    (@fields $field:ident : Some($fty:ty) $(, $($rest:tt)*)?) => {
        #[doc = concat!("Sets `", stringify!($field), "` to `Some(value)` (see the field).")]
        #[must_use]
        pub fn $field(mut self, value: impl Into<$fty>) -> Self {
            self.$field = Some(value.into());
            self
        }
        $crate::option_setters!(@fields $($($rest)*)?);
    };
    (@fields $field:ident : $fty:ty $(, $($rest:tt)*)?) => {
        #[doc = concat!("Sets `", stringify!($field), "` (see the field).")]
        #[must_use]
        pub fn $field(mut self, value: impl Into<$fty>) -> Self {
            self.$field = value.into();
            self
        }
        $crate::option_setters!(@fields $($($rest)*)?);
    };
}
