pub mod backprop;
